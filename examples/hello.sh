#!/bin/sh
# Uploaded into the guest by sample-job.json and run by its "build" step.
set -eu
echo "hello from $(uname -n): GREETING is '${GREETING}'"
# The runner hides every secret value in the job's output: this prints ***.
echo "the token is ${API_TOKEN}"
