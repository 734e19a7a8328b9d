"""visor.data"""
