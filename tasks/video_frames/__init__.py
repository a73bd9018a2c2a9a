"""Video QA with frame tools: a VLM answers multiple-choice questions about a video by calling frame tools."""
