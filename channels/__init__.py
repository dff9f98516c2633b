"""Channel adapters: each turns its medium's input into Events and delivers outbound messages."""
