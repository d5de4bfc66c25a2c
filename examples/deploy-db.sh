#!/bin/sh
# A sample database deploy, as a deploy-tooling team would write it.
# It resolves the database (fine), then runs the drain tool, which, without
# anyone having decided it, checks the frontend for a newer version of
# itself: a circular dependency guard makes visible.
set -e
here=$(dirname "$0")

echo "deploy-db: looking up the database primary"
getent hosts db.internal

echo "deploy-db: draining connections"
"$here/dbctl" drain || echo "deploy-db: dbctl failed (exit $?)"

echo "deploy-db: done"
