"""llmkiln command line (`kiln`) and the pipeline that chains the stages."""
