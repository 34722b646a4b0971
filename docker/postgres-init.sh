#!/usr/bin/env bash
# Run once by the postgres image, on its first start with an empty data volume
# (/docker-entrypoint-initdb.d): a login role for lora-sweep, not a superuser, owning the three
# databases it uses, `mlflow` (MLflow's backend store), `mlflow_auth` (the users of MLflow's
# basic-auth app) and `optuna` (the Optuna studies).
# The password comes from the container's environment (SWEEP_DB_PASSWORD, set in docker/.env);
# psql's :'var' quoting keeps it a string literal whatever characters it holds.
set -euo pipefail

: "${SWEEP_DB_PASSWORD:?SWEEP_DB_PASSWORD must be set (docker/.env)}"
role="${SWEEP_DB_USER:-sweep}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
     -v role="$role" -v password="$SWEEP_DB_PASSWORD" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE mlflow OWNER :"role";
CREATE DATABASE optuna OWNER :"role";
CREATE DATABASE mlflow_auth OWNER :"role";
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
