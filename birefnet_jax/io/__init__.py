"""Reading and writing what the model sees and makes: image decoding, resizing, mask encoding, and
atomic file writes. The lowest layer of the package: it imports nothing else of it, so inference,
training and metrics share it."""
