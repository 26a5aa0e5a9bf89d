"""pitstop.image: image builds from recipes (see issue: image builder)."""
