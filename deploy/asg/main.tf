# The appliance fleet: a launch template whose user data renders the daemon's configuration, an
# Auto Scaling group across the subnets with instance refresh, and a termination lifecycle hook
# that lets each instance drain and leave gossip before it goes.

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

data "aws_vpc" "this" {
  id = var.vpc_id
}

locals {
  lifecycle_hook_name = "${var.name}-terminate"
  asg_arn             = "arn:${data.aws_partition.current.partition}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${var.name}"

  # The module owns the settings the infrastructure depends on: where /ready and /metrics are
  # served (the NLB health check and the security groups use the port), the gossip port, and the
  # data plane. With Envoy, systemd runs it (fwdproxy-envoy.service), so it keeps serving while
  # the daemon restarts; the daemon serves xDS only (dataplane: none). The admin address is the
  # one `fwdproxy bootstrap` writes and the image's stats listener reads. The image's groups own
  # the daemon's sockets in /run/fwdproxy: envoy the xDS socket (Envoy's user is in it), and
  # fwdproxy-admin the admin socket (operators: usermod -aG fwdproxy-admin NAME) unless the
  # configuration names another.
  fwdproxy_config = merge(var.fwdproxy_config, {
    metrics = { address = "0.0.0.0:${var.metrics_port}" }
    # Gossip is encrypted with the keyring cloud-init fetches; peers are this group's instances.
    peers = merge(try(var.fwdproxy_config.peers, {}), {
      bind    = "0.0.0.0:${var.gossip_port}"
      keyring = "/etc/fwdproxy/gossip.keys"
      aws     = merge(try(var.fwdproxy_config.peers.aws, {}), { autoScalingGroup = var.name })
    })
    discovery = merge(try(var.fwdproxy_config.discovery, {}), { files = concat(try(var.fwdproxy_config.discovery.files, []), var.catalog_yaml == null ? [] : ["catalog.yaml"]) })
    dataplane = var.dataplane == "envoy" ? "none" : "builtin"
    envoy     = { adminAddress = "127.0.0.1:15000" }
    xds       = merge(try(var.fwdproxy_config.xds, {}), { group = "envoy" })
    admin     = merge({ group = "fwdproxy-admin" }, try(var.fwdproxy_config.admin, {}))
  })

  units = concat(["fwdproxy.service", "fwdproxy-lifecycle.service"], var.dataplane == "envoy" ? ["fwdproxy-envoy.service"] : [])

  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    config_yaml         = yamlencode(local.fwdproxy_config)
    catalog_yaml        = var.catalog_yaml
    asg_name            = var.name
    lifecycle_hook_name = local.lifecycle_hook_name
    units               = local.units
    region              = data.aws_region.current.name
    gossip_keyring_arn  = var.gossip_keyring_secret_arn
  })

  tags = merge(var.tags, { "fwdproxy:fleet" = var.name })
}

resource "aws_launch_template" "this" {
  name_prefix            = "${var.name}-"
  description            = "fwdproxy appliance ${var.name}"
  image_id               = var.ami_id
  instance_type          = var.instance_type
  update_default_version = true
  vpc_security_group_ids = [aws_security_group.instances.id]
  user_data              = base64gzip(local.user_data)

  iam_instance_profile {
    arn = aws_iam_instance_profile.this.arn
  }

  # IMDSv2 only; hop limit 1 keeps the instance role away from anything but the host.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.root_volume_size
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = var.name })
  }

  tags = local.tags

  lifecycle {
    precondition {
      # EC2 takes at most 16 KiB of user data (here gzip-compressed, which cloud-init unpacks).
      condition     = length(base64gzip(local.user_data)) <= floor(16384 * 4 / 3)
      error_message = "The compressed user data exceeds 16 KiB; keep a large catalog out of catalog_yaml and load it with the fleet admin API (fwdproxy apply) or Kubernetes discovery instead."
    }
  }
}

resource "aws_autoscaling_group" "this" {
  name                      = var.name
  vpc_zone_identifier       = var.subnet_ids
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  health_check_type         = "ELB"
  health_check_grace_period = var.health_check_grace_period
  target_group_arns         = [for tg in aws_lb_target_group.port : tg.arn]
  default_instance_warmup   = var.health_check_grace_period
  termination_policies      = ["OldestLaunchTemplate", "OldestInstance"]
  wait_for_capacity_timeout = "15m"
  enabled_metrics = [
    "GroupDesiredCapacity", "GroupInServiceInstances", "GroupPendingInstances",
    "GroupTerminatingInstances", "GroupTotalInstances",
  ]

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  # A new launch template version (AMI, configuration) replaces the instances a few at a time,
  # each new one taking traffic only once /ready answers 200.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = var.instance_refresh_min_healthy_percentage
      instance_warmup        = var.health_check_grace_period
      auto_rollback          = true
    }
  }

  # Created with the group, so no instance ever runs without it: on scale-in the NLB deregisters
  # and drains the instance (deregistration_delay), then the hook holds it in Terminating:Wait
  # while fwdproxy-lifecycle.service stops Envoy and the daemon (which leaves gossip) and
  # completes the action.
  initial_lifecycle_hook {
    name                 = local.lifecycle_hook_name
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = var.termination_timeout
    default_result       = "CONTINUE"
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = var.name })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity]

    precondition {
      condition     = var.max_size >= var.min_size && (var.desired_capacity == null ? true : var.desired_capacity >= var.min_size && var.desired_capacity <= var.max_size)
      error_message = "Sizes must satisfy min_size <= desired_capacity <= max_size."
    }
  }
}

resource "aws_autoscaling_policy" "cpu" {
  count                  = var.cpu_target_percent == null ? 0 : 1
  name                   = "${var.name}-cpu"
  autoscaling_group_name = aws_autoscaling_group.this.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    predefined_metric_specification {
      predefined_metric_type = "ASGAverageCPUUtilization"
    }
    target_value = var.cpu_target_percent
  }
}
