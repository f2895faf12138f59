"""Storage-efficient token datasets: images stored as grids of VQ-codebook ids (SeiT's format, exactly,
and a compact one of ours), the VQ tokenizer that makes them, codebook utilities and token
augmentations."""
