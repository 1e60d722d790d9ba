"""CNNGemma's library code outside the remote-code model folder: command-line errors, output folders and locks.

The model itself (what the Hub receives as remote code) lives in `modeling_cnngemma/`.
"""
