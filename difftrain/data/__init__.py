"""Data: sources (digits, imagefolder, hf), captions, image transforms, the replayable batch order, caches."""
