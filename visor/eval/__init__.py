"""visor.eval"""
