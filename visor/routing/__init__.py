"""visor.routing"""
