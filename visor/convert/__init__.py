"""visor.convert"""
