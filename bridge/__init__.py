"""Protocol edges over the bus client, one thin module per protocol (see ARCHITECTURE.md)."""
