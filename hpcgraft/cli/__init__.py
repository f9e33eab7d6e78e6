"""The commands: each module parses its command line and calls the layers below; nothing else lives here."""
