"""Command-line entry points only (`python -m xcomp_lab.tools.<name>`): course, site, guide, gpu_run, gpu_split_run, benchmark, train, samples."""
