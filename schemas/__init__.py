"""Arrow schemas and the artifact manifest: every data shape raee-ops reads or writes is defined here."""
