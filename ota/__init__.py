"""pitstop.ota: update bundles, their signatures and verification, and (later) the A/B installer."""
