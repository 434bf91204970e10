"""The PLM owner's representation server (`pema-server`)."""
