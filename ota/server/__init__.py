"""pitstop.ota.server: the site/dev update server (hawkBit DDI subset, OTLP ingest, SQLite)."""
