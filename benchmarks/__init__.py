"""CNNGemma benchmarks: encoder throughput, end-to-end captioning against a PaliGemma baseline, training speed.

Run `python -m benchmarks [encoders|captioning|training|all|report] [--quick]`; see `benchmarks/__main__.py`.
"""
