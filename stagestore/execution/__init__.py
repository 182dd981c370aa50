"""Running a pipeline: child processes and the per-run stop token (`processes`), classifying
failures (`classify`), checks (`gates`), retries, breaker and systemic detection
(`resilience`), one attempt (`attempt`), one stage in one scope (`stagework`), the run
(`runner`), item runs on Dask (`dask`), and the child entry points of `call` stages and kinds."""
