#!/bin/sh
# First start: a cluster owned by $POSTGRES_USER with a password (scram), one database;
# then the server on every interface of the container (the compose network only: the
# stack publishes no port of it).
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | tail -n 1)
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 >/dev/null
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != "postgres" ]; then
        "$bin/postgres" -D "$PGDATA" -c listen_addresses='' -k /var/run/postgresql &
        pid=$!
        until "$bin/pg_isready" -q -h /var/run/postgresql -U "$user"; do sleep 0.5; done
        PGPASSWORD=$POSTGRES_PASSWORD "$bin/createdb" -h /var/run/postgresql -U "$user" "$db"
        kill "$pid"; wait "$pid" || true
    fi
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -k /var/run/postgresql
