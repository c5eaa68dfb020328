"""Decoding: the decoding rules, sequential and blockwise parallel decoding (Stern et al.
2018, section 3), acceptance, the compiled step and the measured choice of k."""
