"""visor.cost"""
