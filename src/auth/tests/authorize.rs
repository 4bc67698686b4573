use super::*;

#[tokio::test]
async fn internal_topics_are_always_refused() {
    let open = Setup::new().auth();
    let closed = Setup::new().passwords(&[("backend", "pw")]).auth();
    let acl = Setup::new()
        .passwords(&[("backend", "pw")])
        .acl("topic readwrite #\ntopic $cluster/#\ntopic $herald/#\nuser backend\ntopic readwrite #\ntopic $cluster/#\ntopic $herald/#\ntopic $herald\n")
        .auth();
    for a in [&open, &closed, &acl] {
        for p in [Principal::Anonymous, Principal::Device, user("backend")] {
            for t in ["$cluster", "$cluster/x", "$herald", "$herald/route/1"] {
                assert!(!a.may_publish(&p, "backend", t), "{p:?} {t}");
                assert!(!a.may_subscribe(&p, "backend", t), "{p:?} {t}");
            }
            assert!(!a.may_subscribe(&p, "backend", "$herald/#"));
            assert!(!a.may_subscribe(&p, "backend", "$cluster/+"));
        }
    }
    // Only those spaces.
    assert!(open.may_publish(&Principal::Anonymous, "x", "$heraldic"));
    assert!(open.may_subscribe(&Principal::Anonymous, "x", "$SYS/#"));
}

#[tokio::test]
async fn default_device_backend_split() {
    let a = Setup::new().passwords(&[("backend", "pw")]).hs256().auth();
    let d = Principal::Device;
    assert!(a.may_subscribe(&d, "dev1", "push/dev1"));
    assert!(!a.may_subscribe(&d, "dev1", "push/dev2"));
    assert!(!a.may_subscribe(&d, "dev1", "push/+"));
    assert!(!a.may_subscribe(&d, "dev1", "push/#"));
    assert!(!a.may_subscribe(&d, "dev1", "#"));
    assert!(!a.may_subscribe(&d, "", "push/"));
    assert!(!a.may_publish(&d, "dev1", "push/dev1"));
    assert!(!a.may_publish(&d, "dev1", "telemetry/dev1"));
    let b = user("backend");
    assert!(a.may_publish(&b, "backend-1", "push/dev1"));
    assert!(a.may_publish(&b, "backend-1", "jobs/x"));
    assert!(a.may_subscribe(&b, "backend-1", "#"));
    assert!(a.may_subscribe(&b, "backend-1", "push/dev1"));
}

#[tokio::test]
async fn device_with_acl_keeps_its_push_topic() {
    let mut s = Setup::new()
        .hs256()
        .acl("topic read public/#\nuser dev1\ntopic write telemetry/dev1\ntopic deny push/#\npattern read config/%c\n");
    s.config.push.topic_template = "dev/{client_id}/inbox".into();
    s.config.auth.allow_anonymous = Some(true);
    let a = s.auth();
    let d = Principal::Device;
    assert!(a.may_subscribe(&d, "dev1", "dev/dev1/inbox"));
    assert!(!a.may_subscribe(&d, "dev1", "dev/dev2/inbox"));
    assert!(a.may_publish(&d, "dev1", "telemetry/dev1"));
    assert!(!a.may_publish(&d, "dev2", "telemetry/dev1"));
    assert!(a.may_subscribe(&d, "dev2", "config/dev2"));
    assert!(!a.may_subscribe(&d, "dev2", "config/dev1"));
    assert!(!a.may_subscribe(&d, "dev1", "public/x"));
    let anon = Principal::Anonymous;
    assert!(a.may_subscribe(&anon, "x", "public/x"));
    assert!(!a.may_publish(&anon, "x", "public/x"));
    assert!(!a.may_subscribe(&anon, "x", "config/x"));
}
