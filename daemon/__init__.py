"""pitstop.daemon: the resident device service (see issue: daemon)."""
