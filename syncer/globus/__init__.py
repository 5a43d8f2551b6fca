"""globus"""
