"""What every notebook shares: papermill parameters, the course steps, notebook helpers, the results file, exercises, charts."""
