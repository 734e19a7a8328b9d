"""visor.processing"""
