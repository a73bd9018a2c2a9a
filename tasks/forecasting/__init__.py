"""Air-quality forecasting plugin: GRPO on a small autoregressive forecaster of hourly PM2.5 (Beijing, UCI)."""
