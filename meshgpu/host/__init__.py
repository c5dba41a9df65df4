"""This host's duties: identity and bootstrap (found, join or restart), registration, fencing,
housekeeping of files the state no longer names."""
