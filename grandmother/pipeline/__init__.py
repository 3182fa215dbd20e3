"""`grandmother run`: the whole job as registered, resumable stages."""
