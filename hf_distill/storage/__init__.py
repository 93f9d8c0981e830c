"""Writing files a later run can trust: atomic writes of files and folders (atomic.py), and fingerprints of models,
tokenizers and data (fingerprint.py) that caches and stages record to tell whether they still match.

Imports only the standard library, torch and numpy.
"""
