"""Prefect flows that wire `pipeline` stages together (discover -> run -> write -> report).

Empty until the segmentation and evaluation flows land (issue 4); the package exists so the
distribution layout is fixed from the start.
"""
