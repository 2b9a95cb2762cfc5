"""The stage machinery: stage objects, the engine that runs them, artifacts, the row store, faults.

Nothing here knows the MoDS method or Prefect."""
