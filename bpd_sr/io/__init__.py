"""Files: images, framing, face data sets, output names, checkpoints and atomic writes."""
