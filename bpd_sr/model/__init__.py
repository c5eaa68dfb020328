"""The model: the Image Transformer (encoder, masked local-1D decoder, proposal heads), its
conditioning net, the token layout and the incremental decoding step with its key/value cache."""
