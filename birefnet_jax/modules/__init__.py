"""The BiRefNet heads: ASPP attention, decoder blocks, lateral blocks."""
