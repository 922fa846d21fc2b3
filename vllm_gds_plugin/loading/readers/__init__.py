"""One module per I/O path behind the :class:`~vllm_gds_plugin.loading.readers.base.Reader` interface:
``gds`` (cuFile DMA into GPU parameters), ``pinned`` (pinned ring + async H2D), ``host`` (CPU platform);
``ring`` is the chunk pipeline the two host paths share."""
