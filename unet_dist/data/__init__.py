"""Raw dataset readers, KMeans colour quantisation, WebDataset shards and their streaming."""
