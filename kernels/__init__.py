"""accumopt's Triton kernels, installed as ``accumopt.kernels`` (setup.py's package_dir).

Empty until the kernels land; ``backend="auto"`` runs accumopt.functional meanwhile.
"""
