"""Who may connect and relay, and how much: networks, address patterns, limits."""
