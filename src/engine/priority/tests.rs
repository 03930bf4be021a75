use super::*;

#[test]
fn raised_while_held_and_given_back_after() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let mine = || getpriority_process(None).unwrap();
    let pooled = |pool: &rayon::ThreadPool| pool.broadcast(|_| getpriority_process(None).unwrap());
    let before = mine();
    let raised = Raised::new(&pool);
    if crate::fsx::running_as_root() {
        assert_eq!(mine(), UNDER_LOCKS.min(before));
        assert_eq!(pooled(&pool), vec![UNDER_LOCKS.min(before); 2]);
    } else {
        assert_eq!(mine(), before, "without the right to raise it, nothing changes");
    }
    drop(raised);
    assert_eq!(mine(), before);
    assert_eq!(pooled(&pool), vec![before; 2]);
}
