#!/bin/sh
# One PostgreSQL database per Flywheel service, each owned by POSTGRES_USER: every service owns its tables.
# Runs once from /docker-entrypoint-initdb.d when the data directory is first initialised (docker-compose and
# the Kubernetes StatefulSet). Idempotent, so an operator can run it again by hand, e.g. after adding a service:
#   kubectl -n flywheel exec postgres-0 -- sh /docker-entrypoint-initdb.d/create-databases.sh
set -eu
for database in ingestion labeling training registry inference; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
SELECT 'CREATE DATABASE "$database" OWNER "$POSTGRES_USER"'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$database')\gexec
SQL
done
