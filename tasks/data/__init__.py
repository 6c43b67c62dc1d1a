"""Label stores in and out: ingest (MaSS13K, CamVid, synthetic scenes), inspect, export."""
