"""visor.train"""
