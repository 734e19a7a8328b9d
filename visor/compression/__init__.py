"""visor.compression"""
