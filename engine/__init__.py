"""Model runtime shared by the prefill and decode pools."""
