"""compressedexample: a Flower / PyTorch app with fedcomp-compressed uploads."""
