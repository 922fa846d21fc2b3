"""The shard tensor checksum: a 128-bit linear checksum of a tensor's bytes that a GPU computes at memory speed
(``naive.py`` defines it in plain torch; ``triton_checksum.py`` computes it for many CUDA tensors in one launch;
``ops.py`` picks one)."""
