//! Diesel's view of the tables created by `migrations/`: every table but `message_search`
//! (a tsvector column, queried with SQL only). `tests/api/schema.rs` checks each table,
//! column, type, nullability, length and primary key here against a migrated database.

diesel::table! {
    projects (id) {
        id -> Uuid,
        #[max_length = 255]
        name -> Varchar,
        head_seq -> Int8,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    sessions (id) {
        id -> Uuid,
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Varchar,
        #[max_length = 50]
        agent_type -> Varchar,
        connected_at -> Timestamptz,
        disconnected_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    agent_messages (id) {
        id -> Uuid,
        project_id -> Uuid,
        #[max_length = 255]
        sender_agent_id -> Varchar,
        #[max_length = 50]
        sender_agent_type -> Varchar,
        sender_session_id -> Nullable<Uuid>,
        #[max_length = 50]
        message_type -> Varchar,
        content -> Text,
        metadata -> Jsonb,
        delivered_at -> Nullable<Timestamptz>,
        read_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        seq -> Int8,
        #[max_length = 255]
        recipient_agent_id -> Nullable<Varchar>,
        priority -> Int2,
        #[max_length = 255]
        correlation_id -> Nullable<Varchar>,
        reply_to -> Nullable<Uuid>,
        expires_at -> Nullable<Timestamptz>,
        #[max_length = 64]
        client_msg_id -> Nullable<Varchar>,
        #[max_length = 50]
        recipient_agent_type -> Nullable<Varchar>,
        expects_reply -> Bool,
        reply_deadline -> Nullable<Timestamptz>,
        replied_at -> Nullable<Timestamptz>,
        in_reply_to_seq -> Nullable<Int8>,
        success -> Nullable<Bool>,
        error -> Nullable<Text>,
        duration_ms -> Nullable<Int8>,
        late -> Bool,
        task -> Bool,
    }
}

diesel::table! {
    members (project_id, agent_id) {
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Varchar,
        #[max_length = 50]
        agent_type -> Varchar,
        ack_floor -> Int8,
        acked_above -> Array<Int8>,
        joined_seq -> Nullable<Int8>,
        current_session_id -> Nullable<Uuid>,
        last_seen_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        capabilities -> Array<Text>,
        description -> Nullable<Text>,
        #[max_length = 16]
        interface -> Nullable<Varchar>,
        last_called_at -> Nullable<Timestamptz>,
        notified_seq -> Int8,
    }
}

diesel::table! {
    dead_letters (message_id) {
        message_id -> Uuid,
        project_id -> Uuid,
        #[max_length = 32]
        reason -> Varchar,
        dead_at -> Timestamptz,
        retried_as -> Nullable<Uuid>,
    }
}

diesel::table! {
    delivery_attempts (project_id, agent_id, seq) {
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Varchar,
        seq -> Int8,
        attempts -> Int4,
    }
}

diesel::table! {
    tokens (id) {
        id -> Uuid,
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Nullable<Varchar>,
        #[max_length = 64]
        token_hash -> Bpchar,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    claims (id) {
        id -> Uuid,
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Varchar,
        paths -> Array<Text>,
        shared -> Bool,
        reason -> Nullable<Text>,
        #[max_length = 16]
        state -> Varchar,
        ttl_ms -> Int8,
        created_at -> Timestamptz,
        decide_at -> Nullable<Timestamptz>,
        granted_at -> Nullable<Timestamptz>,
        expires_at -> Nullable<Timestamptz>,
        ended_at -> Nullable<Timestamptz>,
        #[max_length = 255]
        ended_by -> Nullable<Varchar>,
        end_reason -> Nullable<Text>,
        notice_id -> Nullable<Uuid>,
    }
}

diesel::table! {
    claim_objections (claim_id, agent_id) {
        claim_id -> Uuid,
        #[max_length = 255]
        agent_id -> Varchar,
        reason -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    tasks (message_id) {
        message_id -> Uuid,
        project_id -> Uuid,
        #[max_length = 16]
        state -> Varchar,
        #[max_length = 255]
        holder -> Nullable<Varchar>,
        claim_timeout_ms -> Nullable<Int8>,
        work_timeout_ms -> Nullable<Int8>,
        claim_deadline -> Nullable<Timestamptz>,
        work_deadline -> Nullable<Timestamptz>,
        claimed_at -> Nullable<Timestamptz>,
        closed_at -> Nullable<Timestamptz>,
        result -> Nullable<Text>,
        offers -> Int4,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    coordination_outbox (id) {
        id -> Uuid,
        project_id -> Uuid,
        message -> Jsonb,
        created_at -> Timestamptz,
    }
}

diesel::joinable!(agent_messages -> projects (project_id));
diesel::joinable!(delivery_attempts -> projects (project_id));
diesel::joinable!(tokens -> projects (project_id));
diesel::joinable!(sessions -> projects (project_id));
diesel::joinable!(members -> projects (project_id));
diesel::joinable!(dead_letters -> agent_messages (message_id));
diesel::table! {
    message_search_progress (project_id) {
        project_id -> Uuid,
        indexed_seq -> Int8,
    }
}

diesel::allow_tables_to_appear_in_same_query!(agent_messages, dead_letters);

diesel::table! {
    cluster_nodes (node_id) {
        #[max_length = 64]
        node_id -> Varchar,
        #[max_length = 255]
        address -> Varchar,
        started_at -> Timestamptz,
        heartbeat_at -> Timestamptz,
        timeout_ms -> Int8,
    }
}

diesel::table! {
    cluster_sessions (session_id) {
        session_id -> Uuid,
        #[max_length = 64]
        node_id -> Varchar,
        project_id -> Uuid,
        #[max_length = 255]
        agent_id -> Nullable<Varchar>,
        generation -> Int8,
        connected_at -> Timestamptz,
    }
}

diesel::table! {
    cluster_duties (duty) {
        #[max_length = 32]
        duty -> Varchar,
        #[max_length = 64]
        node_id -> Nullable<Varchar>,
        acquired_at -> Nullable<Timestamptz>,
    }
}
