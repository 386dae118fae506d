"""`data.streaming`: sources read as they are trained on (`dataset.StreamedData`), shard by shard (`shards`), each
source's order, checks and place (`source_stream`)."""
